"""`python -m fmnist_lab [overrides]`: see fmnist_lab.cli."""

from fmnist_lab.cli import main

if __name__ == "__main__":
    main()
