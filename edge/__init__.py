"""The device agent: sources, preprocessing, engines, judge, tasks and the run loop."""
