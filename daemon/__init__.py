"""The mmfuse daemon process: configuration, start-up, shutdown, and the replay tool."""
