"""`generate`: host-side preparation, one jitted program, the while-loop searches, the decoding plan."""
