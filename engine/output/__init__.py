"""What a run leaves on disk: the records and their files (``records``, ``writer``), resume
state (``checkpoint``), the manifest, the run report, the directory lock."""
