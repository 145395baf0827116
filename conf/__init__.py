"""The configs as the package ``tnt_lightning.conf`` (pyproject.toml maps this folder into it).

A built wheel carries them inside the package, where Hydra finds them as
``pkg://tnt_lightning.conf``; :func:`tnt_lightning.config.config_dir` gives their folder.
"""
