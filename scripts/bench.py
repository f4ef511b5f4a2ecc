"""`chatedit-bench` from a source checkout: chatedit/cli/bench.py."""

from chatedit.cli.bench import main

if __name__ == "__main__":
    main()
