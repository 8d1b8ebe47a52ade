"""What every Chorus process shares and that is not the wire: settings loading and logging set-up.

Below `coordinator/`, `participant/` and `federation/`, which import it; it imports none of them.
"""
