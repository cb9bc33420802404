"""The cloud side: subscribes to escalations, dispatches them to Triton, publishes results."""
