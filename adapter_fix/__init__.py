"""adapter-fix: repair LoRA adapters so fine-tuning stops erasing safety alignment."""

__version__ = "0.1.0"
