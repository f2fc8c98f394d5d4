"""The media service: burst merge, long exposure and region animation (numpy/OpenCV, no weights)."""
