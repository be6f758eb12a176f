/**
 * Errors an operator sees. Each carries an HTTP status and a one-line message that says what to
 * fix; the API and CLI print the message, never a stack trace.
 */
export class GpuvmError extends Error {
  constructor(
    readonly status: number,
    readonly code: string,
    message: string,
  ) {
    super(message);
    this.name = 'GpuvmError';
  }
}

export const badRequest = (message: string) => new GpuvmError(400, 'bad-request', message);
export const notFound = (message: string) => new GpuvmError(404, 'not-found', message);
export const conflict = (code: string, message: string) => new GpuvmError(409, code, message);
