"""`python -m phitune` and `accelerate launch -m phitune` enter here."""
from phitune.cli import main

if __name__ == "__main__":
    main()
