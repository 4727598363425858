"""One run over many machines (``run.backend = "ray"``): the driver keeps the seeds, the resume
state, the one writer, the report and the signals; worker actors on a Ray cluster run the
units (``worker``), leasing quota from one shared limiter (``quota``, ``lease``); the driver
sends units to live workers and sends again those a lost worker had (``dispatch``). Only
``ray_backend`` imports ray, and only ``backend.remote_units`` imports it, lazily: a local run
never does."""
