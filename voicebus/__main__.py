from voicebus.cli import main

raise SystemExit(main())
