"""Online scoring on Ray Serve: request bodies, the deployment, and the application builder."""
