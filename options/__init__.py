"""Command-line options: base, train and test. ``parse(args)`` has no side effects; ``setup`` prints
the options, saves ``opt.json`` and seeds the random generators."""

from options.base_options import BaseOptions, load_options, options_text, save_options, setup  # noqa: F401
