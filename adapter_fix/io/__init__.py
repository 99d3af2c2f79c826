"""Reading and writing: sources, the Hub, checkpoints, adapters, the atomic writer. No math."""
