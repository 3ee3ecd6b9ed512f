"""Cell graphs: neighbours, moments, velocity transitions, projection and streamlines.

Plain numpy/scipy: nothing here imports torch or Panel.
"""
