"""Inference engines behind one small interface; pick one by name with :func:`create_engine`."""
