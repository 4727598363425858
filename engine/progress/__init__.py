"""Live progress: counting the units, sampling the figures (``display``), and their text
(``view``)."""
