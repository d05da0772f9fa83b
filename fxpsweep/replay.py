"""Command: recompute exported golden vectors with numpy alone and check them (``fxpsweep.golden.replay``).

    python -m fxpsweep.replay EXPORT_DIR
"""

from fxpsweep.golden.replay import main

if __name__ == "__main__":
    main()
