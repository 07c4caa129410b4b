"""Jobs across the process boundary: the worker, the client that starts it, the installer."""
