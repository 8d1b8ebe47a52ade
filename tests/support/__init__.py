"""What the tests share: scripted participants, coordinators on either broker, fault and attack tools.

Test modules import their helpers from here, never from another test module or from `conftest`
(fixtures still come from conftest.py, which imports from here too); tests/test_import_rules.py checks it.
"""
