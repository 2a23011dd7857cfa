"""The catalogue of bad input (issue 14): ``make reliability`` prints it as a table."""
