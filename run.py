"""``python run.py [group=option ...] [key=value ...]``: the clone's name for ``tnt-lightning`` (README)."""

from tnt_lightning.run import cli

if __name__ == "__main__":
    cli()
