"""`python -m worker_client.backends.echo --addr host:port`."""

from worker_client.backends.echo.server import main

if __name__ == "__main__":
    main()
