"""Models, found by name: ``--model X`` loads ``models/X_model.py`` and its ``XModel`` class.

A new model is one new file: subclass :class:`models.base_model.BaseModel`, implement
``set_input``, ``forward`` and ``optimize_parameters``, and fill ``loss_names``,
``model_names`` and ``visual_names``. Optional ``modify_commandline_options`` adds flags.
"""

from __future__ import annotations

import argparse

from models.base_model import BaseModel
from util.registry import available, find_class


def available_models() -> list[str]:
    return available("models", "model")


def find_model_using_name(name: str) -> type[BaseModel]:
    """The model class for ``name``; :class:`util.registry.RegistryError` lists the names if unknown."""
    return find_class("models", name, "model", BaseModel)


def get_option_setter(name: str):
    return find_model_using_name(name).modify_commandline_options


def create_model(opt: argparse.Namespace) -> BaseModel:
    """Instantiate the model that ``opt.model`` names."""
    model = find_model_using_name(opt.model)(opt)
    print(f"model [{type(model).__name__}] was created")
    return model
