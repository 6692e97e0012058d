"""`python -m autorank +device=rpi4`: the main job (see autorank/app.py)."""

from autorank.app import main

if __name__ == "__main__":
    main()
