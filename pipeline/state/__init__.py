"""Profile-table state: the compact msgpack codec of profiles and forwarding records."""
