"""Brokers: the embedded amqtt broker, and configs for Mosquitto and clustered brokers."""
