"""The faithful SGLang stand-in (see sglang/launch_server.py)."""
