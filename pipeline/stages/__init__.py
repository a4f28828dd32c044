"""The job's stages: each a class whose one method takes rows and returns rows, declaring the
columns it reads (and why) and writes, and attaching errors to the row instead of raising.
decode/ (frames sampled by time), guidance (CLIP embeddings, frame selection, RoI), answer (the
Video-LLM with Free-MoRef), output_rows (frames staged in the store; answers rows for the driver).
No Ray here: the run builds Ray Data operators from these classes. May import the base and store/."""
