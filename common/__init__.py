"""What every Chorus process shares and that is not the wire: settings loading, logging set-up, and the
sentence embedder (consensus embeds answers with it, participants evaluate with it).

Below `coordinator/`, `participant/` and `federation/`, which import it; it imports none of them.
"""
