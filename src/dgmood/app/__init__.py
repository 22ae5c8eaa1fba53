"""The application: run directories, the command line, the HTTP server."""
