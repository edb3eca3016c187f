from scheduling.management.commands._loop import LoopCommand


class Command(LoopCommand):
    help = "Run the health monitor: one tick with --once, else one tick every LOCALAI_HEALTH_CHECK_INTERVAL."
    interval_setting = "LOCALAI_HEALTH_CHECK_INTERVAL"

    def tick(self):
        from scheduling.health import health_tick

        return health_tick()
