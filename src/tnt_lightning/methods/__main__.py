"""``python -m tnt_lightning.methods``: the registered methods as a Markdown table."""

from ..engine.registry import markdown_table

if __name__ == "__main__":
    print(markdown_table())
