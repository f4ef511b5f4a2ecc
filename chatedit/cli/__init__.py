"""The command-line entry points (thin: parse config, call the library, write outputs):
console scripts `chatedit-train`, `-edit`, `-eval`, `-bench`, `-align`, `-collect`, and in a
source checkout `python scripts/<name>.py`. Their hydra configs ship in `chatedit/conf/`."""
