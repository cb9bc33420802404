"""systemd unit files shipped with edgewire (rendered onto devices by `edgewire flash`)."""
