"""`chatedit-train` from a source checkout: chatedit/cli/train.py."""

from chatedit.cli.train import main

if __name__ == "__main__":
    main()
