"""Fracture classifier and Grad-CAM++ maps (the HGAM guidance)."""
