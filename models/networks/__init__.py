"""Networks, one family per file. ``init_net`` initialises weights and moves to a device."""

from models.networks.init import init_net, init_weights  # noqa: F401
