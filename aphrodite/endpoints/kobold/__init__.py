"""The KoboldAI API (``--launch-kobold-api``): KoboldAI United's ``/api/v1`` and KoboldCpp's ``/api/extra``
routes, served by the same app and engine as the OpenAI API, with Aphrodite's names and answers."""
