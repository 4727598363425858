"""One run: the job that wires it, the scheduler (producer, workers, writer), signals,
statistics, the preflight and the breaker."""
