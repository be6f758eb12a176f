/** pino JSON logs; every line about a VM, partition, host or effect carries its ids. */
import pino, { type Logger } from 'pino';

export function createLogger(level: string, destination?: pino.DestinationStream): Logger {
  return pino({ level, base: { service: 'gpuvm' }, timestamp: pino.stdTimeFunctions.isoTime }, destination);
}

export type { Logger };
