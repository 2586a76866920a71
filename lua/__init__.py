"""The Lua scripts: the only code that changes a balance. Loaded by engine/scripts.py."""
