"""The embedded demo teacher: a tiny local model on llama.cpp when no endpoint is set
(``demo`` prepares it, ``server`` runs it, ``resolve`` decides whether it is needed)."""
