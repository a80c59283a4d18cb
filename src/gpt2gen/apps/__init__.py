"""What a user runs: the command line, the demo, multi-device generation, the samples they share. Imports every layer below; nothing imports it."""
