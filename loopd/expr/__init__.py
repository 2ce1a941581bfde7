"""Ground floor: the expression and template compiler, dotted paths, topic patterns.

Imported by rules, workflows, packs and sources; imports nothing of loopd but errors and events."""
