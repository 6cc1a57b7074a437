"""Starting and stopping the processes a benchmark needs: servers, image server, probe."""
