"""The embedded CPU demo: a tiny warm-started model on the synthetic arithmetic task, SPPO
with the local engine, the shuffled-reward control, and the SPPO-vs-baselines study."""
