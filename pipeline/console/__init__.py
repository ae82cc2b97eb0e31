"""What a person sees: log files, the progress line or bar, the summary; private local files."""
