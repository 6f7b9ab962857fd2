"""Generation on a loaded model: the device and precision policy, model parts held in memory only while in use,
tiled autoencoding, the safety checker, and the pipeline that turns prompts and seeds into images."""
