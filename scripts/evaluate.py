"""`chatedit-eval` from a source checkout: chatedit/cli/evaluate.py."""

from chatedit.cli.evaluate import main

if __name__ == "__main__":
    main()
