"""`chorus-replay`: recorded message logs read back, consensus re-run offline, logs re-published to a
broker, and reports; plus the recording hook the coordinator runs with (`recording.with_recording`)."""
